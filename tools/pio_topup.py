# PlatformIO extra script: no compiler runs (the firmware is MicroPython); `upload` is
# `topup flash`, and `provision` is `topup provision` for the env's custom_device.
Import("env")  # noqa: F821 - provided by PlatformIO's SCons

env.Replace(PROGNAME="meter", BUILD_FLAGS=[], SRC_FILTER=["-<*>"])  # noqa: F821


def _topup(*args):
    return "topup %s" % " ".join(args)


env.AddCustomTarget(  # noqa: F821
    name="provision",
    dependencies=None,
    actions=[_topup("provision", "--port", "$UPLOAD_PORT", "--device",
                    env.GetProjectOption("custom_device", ""))],  # noqa: F821
    title="Provision",
    description="Run the meter firmware's provisioning and register the device key (topup provision)",
)
env.AddCustomTarget(  # noqa: F821
    name="han-status",
    dependencies=None,
    actions=[_topup("han", "status", "--port", env.GetProjectOption("custom_han_port", ""))],  # noqa: F821
    title="HAN status",
    description="Ask the meter for its status over the HAN (topup han status)",
)
