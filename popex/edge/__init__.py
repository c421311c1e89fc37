"""The edge tier: EdgeNode, request pipeline, preparation, store, plans, uplink monitor, cloud port."""
