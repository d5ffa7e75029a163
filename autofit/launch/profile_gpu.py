"""Which device a `--profile` run is for: the profile's [hardware] table, and for a GPU profile
the card here that runs it (the profile's own, or a larger one capped with --emulate). Checked
before the dataset is read and before any probe (check_profile_here), and used to open the
device (gpu_for_profile)."""
from __future__ import annotations

import shlex

from autofit.devices.device import DeviceError
from autofit.devices.hardware import builtin_hardware as _builtin_hardware, load_builtin, slug_for
from autofit.launch.probe import ProbeOptions
from autofit.planning import agree
from autofit.profiles.store import ProfileError, check_profiles_writable, load_profile


def no_profile_words(profile: str) -> str:
    """'no profile named X (yours: cpu-64mb; built-in: ...; create one ...)': the user's saved
    profiles too, not only the built-ins (t7: a cpu-32mb typo listed the GPUs, not the user's cpu-64mb)."""
    from autofit.profiles.manage import list_profiles
    builtins = set(load_builtin())
    yours = [e.name for e in list_profiles() if e.name not in builtins]
    return (f"no profile named {profile!r} ({'yours: ' + ', '.join(yours) + '; ' if yours else ''}"
            f"built-in: {', '.join(sorted(builtins))}; create one with autofit probe --save)")


def check_profile_here(profile: str, emulate: bool, probe_opts: ProbeOptions, model_args: list[str] = ()) -> None:
    """Before the dataset is read and before any probe: the profile exists, a GPU profile's card
    (or a larger one with --emulate; --emulate is refused for a CPU profile) is here, and the profiles folder takes a plan a probe would
    save. `model_args`: the command's --config/--preset/--set (and lever flags), for the estimate
    it suggests where the card is missing. Raises ProfileError or DeviceError (one line)."""
    check_profiles_writable(profile)
    saved = load_profile(profile, builtin=_builtin_hardware)
    if saved is None:
        raise ProfileError(no_profile_words(profile))
    hw = hardware_of(profile, saved)
    on_cpu = hw.get("kind") == "cpu"
    if probe_opts.device is not None and (probe_opts.device == "cpu") != on_cpu:
        raise DeviceError(f"profile {profile} is for {'the CPU' if on_cpu else 'a GPU'}, and this run asks for "
                          f"device {probe_opts.device!r} (--device, or the config's device): drop one of them")
    if on_cpu and emulate:  # --emulate caps a GPU; a CPU profile's budget is enforced already
        raise DeviceError(f"--emulate caps a larger GPU to a profile's card, and {profile} is a CPU profile (its "
                          f"budget is enforced on the CPU as it is): drop --emulate")
    if not on_cpu:
        gpu_here(profile, hw, emulate, probe_opts, model_args)


def hardware_of(profile: str, saved) -> dict:
    """A profile's [hardware] table: its file's, or for a built-in's name the built-in's (a plan
    saved under a built-in name stores none). Raises ProfileError for a file with neither."""
    hw = saved.hardware or _builtin_hardware(profile)
    if hw is None:  # hand-written or damaged: neither a card nor a CPU budget to run on
        raise ProfileError(f"profile {profile} has no [hardware] table, so which GPU or CPU budget it is for is "
                           f"unknown; probe again with --save, or clear it with: autofit profiles rm {profile}")
    return dict(hw)


def gpu_here(profile: str, hw: dict, emulate: bool, probe_opts: ProbeOptions, model_args=()):
    """(NVML index, DeviceInfo, its profile slug) of the GPU that would run `profile`: the
    profile's card, or a larger one with --emulate. Raises DeviceError naming what is wrong."""
    from autofit.devices.cuda import detect_gpu, set_allocator_conf
    set_allocator_conf()  # before anything can initialise CUDA
    from autofit.devices.ranks import gpu_index
    if probe_opts.gpu_index is not None and agree.ranks().several:
        raise DeviceError(f"--gpu-index {probe_opts.gpu_index}: under torchrun each rank takes the GPU of its "
                          f"LOCAL_RANK; drop --gpu-index")
    index = gpu_index(probe_opts.gpu_index or 0)  # torchrun: this rank's GPU
    try:
        info = detect_gpu(index)
    except DeviceError as e:
        raise DeviceError(f"profile {profile} is for a GPU, and none was found ({e}); "
                          f"for an estimate without the card, run: "
                          f"{shlex.join(['autofit', 'probe', '--gpu', profile, *model_args])}") from None
    here = slug_for(info.name, info.total_bytes)
    cap = int(hw.get("memory_bytes") or 0)
    if here != profile:
        if not (cap and info.total_bytes > cap):
            raise DeviceError(f"this GPU is {here}, not {profile} (and not larger); "
                              f"probe it with autofit probe --save")
        if not emulate:
            raise DeviceError(f"this GPU is {here}, larger than the profile's {profile}; add --emulate to cap this "
                              f"process to {profile}'s memory and train as if on that card")
    return index, info, here


def gpu_for_profile(profile: str, hw: dict, emulate: bool, probe_opts: ProbeOptions):
    """The CUDA device for a GPU profile: (device, emulated_on or None). This GPU must be the
    profile's card, or a larger one with --emulate (capped to the profile's memory)."""
    from autofit.devices.cuda import open_cuda_device
    index, info, here = gpu_here(profile, hw, emulate, probe_opts)
    cap = int(hw.get("memory_bytes") or 0)
    emulated_on = here if here != profile else None
    from autofit.devices.hardware import ASSUMED_DRIVER_RESERVED_SHARE
    reserved = hw.get("driver_reserved_bytes")
    how = f"{profile}'s memory {cap:,} B less its driver-reserved {int(reserved or 0):,} B (measured, in the profile)"
    if reserved is None and emulated_on:
        reserved = int(cap * ASSUMED_DRIVER_RESERVED_SHARE)
        log_note = (f"{profile}'s driver-reserved memory is not measured yet: assumed {ASSUMED_DRIVER_RESERVED_SHARE:.0%} "
                    f"of {cap:,} bytes")
        info = info.model_copy(update={"note": (info.note + "; " if info.note else "") + log_note})
        how = f"{profile}'s memory {cap:,} B less an assumed {ASSUMED_DRIVER_RESERVED_SHARE:.0%} driver reserve"
    usable = cap - int(reserved or 0)  # what such a card really offers the process
    device = open_cuda_device(index, info=info, emulate_usable_bytes=usable if emulated_on else None,
                              emulate_how=how if emulated_on else None)
    return device, emulated_on
