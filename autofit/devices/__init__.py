"""Devices: the Device protocol (device), DeviceInfo and DeviceError without torch (info), CUDA with NVML (cuda, nvml), the budgeted and plain CPU
devices (cpu_budget, cpu), hardware profiles for simulated GPUs (hardware), a rank's share under
torchrun (ranks), the one way to open one (opener), and other processes' load on our CPU cores
during a CPU probe (host_load). May import profiles/ and the bottom
modules (units, interrupts, records); never planning/, launch/, report/ or cli/."""
