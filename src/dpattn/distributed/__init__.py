"""Distributed — inside every rank: process groups (world, attn_tp; CPU and device flavours) on
gloo / NCCL, the in-process thread backend that checks every collective across ranks, and for
pipeline stages the rank numbering (layout.py) and the links between stages (pipeline.py)."""
