"""Tickets: the architecture record, the file format, saving and loading, and the Hub.

``architecture``: which network a ticket rebuilds (the registries). ``io``: the format,
``save_ticket`` / ``load_ticket``. ``hub``: sources, the model card, ``push_to_hub``.
"""
from timm_fslt.ticket.architecture import create_model, register_builder, registered_builders
from timm_fslt.ticket.io import (FORMAT_VERSION, load_ticket, read_config, read_ticket, save_ticket,
                                 seal_config, size_report_from_config)
from timm_fslt.ticket.hub import push_to_hub

__all__ = ["FORMAT_VERSION", "create_model", "load_ticket", "push_to_hub", "read_config", "read_ticket",
           "register_builder", "registered_builders", "save_ticket", "seal_config", "size_report_from_config"]
