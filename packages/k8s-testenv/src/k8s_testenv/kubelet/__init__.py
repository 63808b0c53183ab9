"""The process kubelet: runs pods bound to its Nodes as local processes.

Pure decisions live in :mod:`.status` (phase, conditions, restarts, back-off) and
:mod:`.podspec` (environment, command line, hostname, probes); :mod:`.network` allocates pod
IPs and builds the per-pod sandbox; :mod:`.runtime` owns one pod's processes; :mod:`.agent`
talks to the API server; :mod:`.logs` serves container logs. Run it with
``python -m k8s_testenv.kubelet CONFIG.json`` (the cluster launcher does).
"""
