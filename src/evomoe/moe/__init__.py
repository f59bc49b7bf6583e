"""The MoE layer: routers, dispatch, experts, losses."""
