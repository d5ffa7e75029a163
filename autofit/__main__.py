"""`python -m autofit`, the form torchrun starts: `torchrun --nproc_per_node N -m autofit run ...`."""
from autofit.cli import main

if __name__ == "__main__":
    main()
