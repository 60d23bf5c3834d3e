"""The Ray launcher: rank actors, their rendezvous, and the driver that supervises them."""
