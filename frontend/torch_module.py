"""torch.nn.Module + example inputs, and saved .pt2 ExportedPrograms -> IR."""
from __future__ import annotations

import os
from pathlib import Path

from amxc.ir import Module

from .errors import FrontendError
from .torch_export import import_exported_program


def import_module(module, example_args: tuple = (), example_kwargs: dict | None = None, *,
                  dynamic_shapes=None, name: str | None = None) -> Module:
    """Trace `module` with torch.export (non-strict, inference mode) and convert it.

    Symbolic sizes take the names of the `torch.export.Dim`s in `dynamic_shapes`."""
    import torch

    module.eval()
    with torch.no_grad():
        ep = torch.export.export(module, tuple(example_args), example_kwargs or {},
                                 dynamic_shapes=dynamic_shapes, strict=False)
    return import_exported_program(ep, name or type(module).__name__,
                                   dim_names=_dim_names(ep, example_args, example_kwargs, dynamic_shapes))


def import_pt2(path: str | os.PathLike) -> Module:
    """A `.pt2` file written by `torch.export.save`."""
    import torch

    path = Path(path)
    try:
        ep = torch.export.load(path)
    except Exception as e:
        raise FrontendError(f"{path}: not a loadable torch.export archive ({type(e).__name__}: {e})") from None
    return import_exported_program(ep, path.stem)


def _dim_names(ep, args, kwargs, dynamic_shapes) -> dict[str, dict[int, str]]:
    """Map placeholder name -> {axis: Dim name} from the user's dynamic_shapes spec."""
    if not dynamic_shapes:
        return {}
    user_inputs = [s.arg.name for s in ep.graph_signature.input_specs if s.kind.name == "USER_INPUT"]
    specs = list(dynamic_shapes.values()) if isinstance(dynamic_shapes, dict) else list(dynamic_shapes)
    names: dict[str, dict[int, str]] = {}
    for placeholder, spec in zip(user_inputs, specs):
        if isinstance(spec, dict):
            names[placeholder] = {axis: getattr(d, "__name__", f"{placeholder}_{axis}")
                                  for axis, d in spec.items() if d is not None}
    return names
