"""The step loop: engine core, scheduler, model runner, the step messages, sequences, the core process.

Deliberately empty of imports, so the torch-free modules here (scheduler, batch, sequence) stay
torch-free when imported through this package.
"""
