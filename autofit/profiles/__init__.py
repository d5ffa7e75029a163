"""Saved profiles: per-GPU TOML files of fingerprinted plans and the lessons a run learned
(store), where they live with their locks and atomic writes (files), and the fingerprint that
says whether a saved plan still applies (fingerprints). May import only the bottom modules
(units, interrupts, records)."""
