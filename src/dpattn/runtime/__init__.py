"""Runtime — how processes start and talk: the process topology (`topology.start_ranks`), the
rank launcher (threads or gloo/NCCL processes, multi-node), each rank's event loop, and the DP
router that picks a DP group per request (frontend process)."""
