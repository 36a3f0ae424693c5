"""diffspace: the design space of diffusion models, after the lecture (MIT 6.S978) and Karras et al. (2022).

Layers, each importing only the ones before it:
schedules -> parameterization -> process / losses / precond -> presets; plots and cli on top.
"""

__version__ = "0.1.0"
