"""From metadata to webdataset shards: YFCC/LAION filters, the img2dataset driver,
shard verification, and the offline demo dataset."""
