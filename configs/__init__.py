"""Experiment configs: one python file per experiment, each with
`get_config() -> train.config.Config`. Run one with
`python -m train --config configs/<name>.py [--set key=value]... [--resume]`.
"""
