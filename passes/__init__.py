"""amxc.passes: IR-to-IR transformations (pass manager, pattern matcher, fusions, quantization)."""
