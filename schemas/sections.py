"""The base of every config section: a misspelt key fails (`extra="forbid"`), assignments are
validated, and NaN or infinity are refused everywhere (an `lr: .inf` would train on garbage)."""

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)
