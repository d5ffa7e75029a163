"""autofit: the launcher that measures what fits and plans the run. Its parts, lowest first; a part
imports only from parts below it (tests/test_layout.py checks this):

- units, interrupts, records: sizes in words, the Ctrl-C lines, the records every part passes on
- profiles/: saved per-GPU plans, their files and fingerprints
- devices/: the Device protocol and each device (CUDA + NVML, CPU, simulated), hardware profiles
- planning/: budget, candidates, estimate, trials, search, planner: from a device to a plan
- launch/, report/: a probe or a run on an opened device (several ranks too); the plan in words
- cli/: the commands
"""
