"""The MonarchMesh operator: pure renderers (``render``), the I/O around them
(``reconcile``), kopf glue (``handlers``); run it with ``python -m monarch_k8s.operator``."""
