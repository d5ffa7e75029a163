"""Configuration: TrainConfig and how it loads (train_config), its errors in words (messages),
nanoGPT's .py config files parsed, never run (pyfile), the presets, the small-GPT options'
impossible combinations (model_options), a schedule of stages (stages) and the system keys, device and
backend, checked (system). May import data/ (a
dataset's vocabulary) and the bottom modules."""
