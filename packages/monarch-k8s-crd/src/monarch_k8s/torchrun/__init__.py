"""TorchrunQueue and TorchrunJob (``torchrun.ai/v1alpha1``), served by the same operator as
MonarchMesh: :mod:`.spec` parses and distributes GPUs, :mod:`.render` makes the job's objects,
:mod:`.status` derives phases, :mod:`.workspace` is how code reaches the workers,
:mod:`.reconcile` does the I/O. All but the last are pure."""
