"""The model: nanoGPT's GPT with activation checkpointing (gpt), the losses (losses), GPT-2's
published weights (pretrained). May import the bottom modules only."""
