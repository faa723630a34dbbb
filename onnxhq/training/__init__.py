"""Training views of a model and what runs on them.

`graph`: the graph edits that make weights differentiable (parameters as inputs, a loss, folded
BatchNormalization, the gradient builder). `engine`: sessions that return losses and gradients
as arrays. `train`: Adam in resumable steps and the cosine learning-rate schedule.
"""
