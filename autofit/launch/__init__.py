"""Running a command on a device: the probe (probe: open the device, budget, plan), a run from a
profile or a probe (run; what it refuses before any work: checks; which card a --profile run is
for: profile_gpu; a saved plan as its lessons changed it: lowered), a resume from a checkpoint
(resume), and torchrun's process group (torchrun) and --nproc-per-node's launcher (launcher). May
import planning/, devices/, profiles/ and the bottom modules; never report/ or cli/."""
