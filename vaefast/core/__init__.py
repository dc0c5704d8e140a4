"""The internal core: unchecked functions on validated tensors, called by the public entry points (which validate
once and set eval mode once) and by the sweep.

- :mod:`~vaefast.core.box`: the data range (:class:`~vaefast.core.box.Box`) that travels with the points;
- :mod:`~vaefast.core.options`: the frozen option objects (estimates, the margin search) with one default each;
- :mod:`~vaefast.core.encoding`: the encoding of a batch (μ, log σ², g(μ(x))), computed once per analysis;
- :mod:`~vaefast.core.sampling`: reparameterised samples of any rows, decoded in chunks derived from the memory
  budget, r-sphere hits for many radii and the exact r* in bounded memory;
- :mod:`~vaefast.core.decide`: the three-way clean decision and the batched multi-radius sequential test;
- :mod:`~vaefast.core.search`: the margin search, one attack path per point serving every radius.
"""
