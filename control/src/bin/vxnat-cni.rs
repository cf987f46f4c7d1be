//! The CNI plugin binary (see `vxnat_control::cni`): install it in the runtime's CNI bin
//! directory and name it in the network configuration's `type`.

fn main() {
    std::process::exit(vxnat_control::cni::main());
}
