"""From an opened device to a plan: the budget, the candidate levers, the closed-form estimate
and throughput, trials of the trainer's own step, the micro-batch search, the contest between
measured plans, the planner and the split, and the agreements that keep ranks in lockstep. May import devices/, profiles/ and the bottom modules;
never launch/, report/ or cli/. Opening a device is launch/'s job."""
