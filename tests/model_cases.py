"""Attention settings shared by the model and decoding tests.

Small windows, so that every attention type differs from dense attention at
the tests' few dozen tokens.
"""

import attn

ATTENTION_KW = {
    "dense": dict(attention="dense"),
    "sliding": dict(attention="sliding", window=4),
    "ppa": dict(attention="ppa", window=4, ppa_p=0.5),
    "superlinear": dict(attention="superlinear",
                        superlinear=attn.SuperlinearConfig(sw_index=1)),
    "superlinear_acc": dict(attention="superlinear", search_key="accumulated",
                            superlinear=attn.SuperlinearConfig(sw_index=1)),
    "hybrid": dict(layer_pattern=("sliding", "superlinear"), window=4,
                   search_key="accumulated",
                   superlinear=attn.SuperlinearConfig(sw_index=1)),
}
