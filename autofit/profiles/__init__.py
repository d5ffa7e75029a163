"""Saved profiles: per-GPU TOML files of fingerprinted plans (store) and the lessons a run learned
(lessons), where they live with their locks and atomic writes (files), the fingerprint that says
whether a saved plan still applies (fingerprints), the [hardware] table typed (hardware_table), and
`profiles list` / `profiles rm` under the lock (manage). May import only the bottom modules
(units, interrupts, records)."""
