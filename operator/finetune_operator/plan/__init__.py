"""Pure planning: a FineTuneJob -> the children it should have, and observed state -> its status.

Imports neither kopf nor a Kubernetes client, so everything here is unit-tested on plain data.
"""
