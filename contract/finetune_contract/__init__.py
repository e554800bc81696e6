"""The contract between the finetune operator and the trainer: the only code both import.

Small and pure (pydantic and the standard library only): the FineTuneJob spec types and their rules,
the API's names and reasons, and the early-stopping policy. The operator image carries no trainer and
the trainer image no operator; both carry this package.
"""
