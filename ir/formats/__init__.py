"""Number formats of quantized weights: NF4 codes (nf4.py), their block scales stored as OCP
E4M3FN bytes (e4m3.py) or as bitsandbytes' dynamic 8-bit codes (dynamic8.py).

These are bit-level definitions shared by every layer that touches quantized data: the op
references, the quantize pass, the bitsandbytes importer and the kernels' repacking.  Each
rule is stated once here, with the source it reproduces."""
