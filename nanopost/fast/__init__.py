"""The same computations as the core, made fast: written-out backward passes, packed decoding,
the chunked LM head. Each is tested against the plain code it replaces."""
