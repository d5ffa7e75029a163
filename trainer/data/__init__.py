"""Data: datasets as nanoGPT lays them out and the batch sampler (datasets), their file formats
(tokenfiles), nanoGPT's meta.pkl read without running code (meta), `autofit data prepare`
(prepare; its texts: sources; the small sets' encodings: text_tokens; llm.c shards that a stop
keeps: shards), and step batches one step ahead (batches).
Imports, outside data/, only trainer's lower parts (errors, paths, interrupt, writes, phases)."""
