"""Several ranks: the process group, Ranks and the Agreement round (ranks), each rank's share of
the effective batch (shares), DDP and FSDP2 wrappers (sharding), and what the loop does
differently with ranks (multirank). May import
model/ and the bottom modules."""
