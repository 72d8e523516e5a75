"""Loss terms of your own: one module per term, named after it.

`star_jax/loss_terms/<name>.py` registers a function with `@losses.register_term("<name>")`;
`config.loss.terms.<name> = weight` then adds it to the objective (the registry imports the
module the first time the name is asked for). A term receives one stack's
`losses.StackPrediction`, the batch and its options (`config.loss.<name>`, if that exists) and
returns a scalar; the training loop applies the per-stack weight `2^i / 2^(S-1)`.
"""
