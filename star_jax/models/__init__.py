"""The landmark networks: the stacked hourglass of STAR and its output structure."""

from star_jax.models.hourglass import (ModelOutput, StackedHourglass, count_parameters,
                                       create_model, init_variables, parameter_shapes)

__all__ = ["ModelOutput", "StackedHourglass", "count_parameters", "create_model",
           "init_variables", "parameter_shapes"]
