from volatility3.framework import interfaces
from volatility3.plugins.windows.kcbwait_analysis import x
class KcbWait(interfaces.plugins.PluginInterface):
    _required_framework_version = (2, 0, 0)
    @classmethod
    def get_requirements(cls):
        return []
    def run(self):
        print(x.X)
