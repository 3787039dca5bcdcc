"""amxc.backends: ISA detection, lowering to kernels, code generation."""
