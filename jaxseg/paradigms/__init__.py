"""Learning paradigms: `PARADIGMS` maps `config.paradigm` to a module with `make_loss_fn`."""

from jaxseg.paradigms import supervised

PARADIGMS = {"supervised": supervised}
