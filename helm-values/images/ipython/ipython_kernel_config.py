# Installed into the single-user image as /etc/ipython/ipython_kernel_config.py
# (and ipython_config.py): every kernel and terminal IPython loads hubml's
# magics, so %%train, %register_model and %deploy work without %load_ext.
# A user may still turn it off in ~/.ipython/profile_default/ by setting
# c.InteractiveShellApp.extensions = [].
c = get_config()  # noqa: F821
c.InteractiveShellApp.extensions = ["hubml"]
