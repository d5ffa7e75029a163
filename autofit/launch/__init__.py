"""Running a command on a device: the probe (probe: open the device, budget, plan), a run from a
profile or a probe (run), a resume from a checkpoint (resume), and torchrun's process group and
--nproc-per-node (torchrun). May import planning/, devices/, profiles/ and the bottom modules;
never report/ or cli/."""
