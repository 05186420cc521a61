"""Recovery: pure losses (:mod:`.losses`), the training loop (:mod:`.loop`), and the methods
(:mod:`.methods`)."""
