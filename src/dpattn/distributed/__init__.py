"""Distributed — inside every rank: process groups (world, attn_tp; CPU and device flavours) on
gloo / NCCL, and the in-process thread backend that checks every collective across ranks."""
