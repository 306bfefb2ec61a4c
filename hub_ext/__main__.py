"""``python -m hubml.hub_ext``: run the hub service (see ``app.HubMLService``)."""

from hubml.hub_ext.app import main

if __name__ == "__main__":
    main()
