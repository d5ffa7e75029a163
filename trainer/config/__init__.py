"""Configuration: TrainConfig and how it loads (train_config), its errors in words (messages),
nanoGPT's .py config files parsed, never run (pyfile), and the presets. May import data/ (a
dataset's vocabulary) and the bottom modules."""
