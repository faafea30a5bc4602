"""Raw CKKS primitives: parameter sets and contexts, flat packing, ciphertext checks,
key wrapping. Private: the package face (:mod:`flowerpets.he`) exposes the safe recipes."""
