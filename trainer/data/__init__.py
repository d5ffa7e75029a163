"""Data: datasets as nanoGPT lays them out and the batch sampler (datasets), their file formats
(tokenfiles), `autofit data prepare` (prepare), and step batches one step ahead (batches).
Imports nothing of trainer outside data/."""
