"""Errors of the frontends: they name the model, the op and the model source line."""


class FrontendError(ValueError):
    pass


class UnsupportedOpError(FrontendError):
    def __init__(self, op: str, loc: str | None, model: str, table: str = "frontend/aten.py"):
        self.op, self.loc, self.model = op, loc, model
        where = f" at {loc}" if loc else ""
        super().__init__(f"unsupported op {op}{where} in model '{model}': amxc has no conversion "
                         f"for it (see {table} for the supported ops)")
