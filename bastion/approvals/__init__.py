"""People in the loop: calls held for approval and results held for review (docs/approvals.md).

`service.Approvals` is the model, `store.ApprovalStore` its database; the pages, the API, the
webhooks and the CLI are modules of their own.
"""
