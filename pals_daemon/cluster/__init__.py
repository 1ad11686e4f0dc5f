"""Cluster mode: a cluster power budget split across node daemons through etcd (README "Running a fleet")."""
