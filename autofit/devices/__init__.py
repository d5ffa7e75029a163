"""Devices: the Device protocol (device), DeviceInfo and DeviceError without torch (info), CUDA with NVML (cuda, nvml), the budgeted and plain CPU
devices (cpu_budget, cpu), hardware profiles for simulated GPUs (hardware), a rank's share under
torchrun (ranks), and the one way to open one (opener). May import profiles/ and the bottom
modules (units, interrupts, records); never planning/, launch/, report/ or cli/."""
