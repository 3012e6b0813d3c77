"""Scaling primitives a user can call: get_data_scale, set_scaling, stop_scaling, rebalance."""
