/**
 * Histo-UNet: import the U-Net predictions of step 07 into a QuPath project.
 *
 * Purpose
 *   For the current image, reads <predictions>/<image name>/<image name>.geojson (written
 *   by notebooks/07_infer_slide.ipynb), removes the objects of the same classes that an
 *   earlier import (or a person) left there, adds the predicted regions and saves the
 *   image data. Run it again after a new prediction: it replaces, never duplicates.
 *
 * Requirements
 *   QuPath 0.5 or later. Tested headless with the classes of QuPath 0.5.1 and 0.7.0
 *   (PathIO.readObjects, the object hierarchy, QP) by tests/test_qupath_groovy.py: all of
 *   the script except the last step (saving the project entry) runs there. A project
 *   whose image names are the slide file names used in the work folder
 *   (e.g. 'CMU-1-Small-Region.svs' -> predictions/CMU-1-Small-Region/).
 *
 * Inputs
 *   PREDICTIONS_DIR/<name>/<name>.geojson: a GeoJSON FeatureCollection in full-resolution
 *   pixel coordinates, one feature per connected region per class, with
 *   properties.objectType ('annotation' or 'detection'), properties.classification
 *   {name, color} and properties.measurements (area in um^2, mean class probability).
 *   <name> is the image name without its extension.
 *
 * Outputs
 *   The image's objects: earlier objects of CLASSES_TO_REPLACE removed, the predicted
 *   regions added (holes kept), their classes coloured as in the GeoJSON (data/classes.yaml);
 *   in a project, the image data saved.
 *
 * Settings
 *   USER SETTINGS below: the predictions folder, the classes whose earlier objects are
 *   replaced, and whether earlier detections of them are replaced too.
 *
 * How to run
 *   In QuPath: Automate > Script editor > open this file > Run (current image) or
 *   Run > Run for project (every image).
 *   Headless:  QuPath script -p project.qpproj groovy/import_predictions.groovy
 *              (the script path is positional; runs once per image of the project and
 *              saves each image's data itself, so -s/--save is not needed).
 *   Errors throw (they never just print): a missing or unreadable GeoJSON stops the
 *   script for that image with a message naming the file. With -p, QuPath logs
 *   "Error running script for image: <name>" and goes on with the next image; with
 *   -i "<image name>" as well it runs that image only and rethrows the error, for a
 *   non-zero exit (QuPath's command-line code; the tests run qupath-script instead).
 */

import com.google.gson.JsonParser
import qupath.lib.io.PathIO
import qupath.lib.objects.hierarchy.PathObjectHierarchy

// ===================== USER SETTINGS =====================
// Folder of the per-slide prediction folders: absolute, or relative to the project folder.
String PREDICTIONS_DIR = 'predictions'
// Classes whose earlier objects are removed before importing (data/classes.yaml names).
def CLASSES_TO_REPLACE = ['Tumor', 'Stroma', 'Other']
// Also remove earlier objects of these classes that are detections (not only annotations).
boolean REPLACE_DETECTIONS = true
// =================== END USER SETTINGS ===================

def imageData = getCurrentImageData()
if (imageData == null)
    throw new IllegalStateException('import_predictions.groovy: no image is open; open a project image or run this script for the project')
def entry = getProjectEntry()   // null outside a project
String imageName = entry != null ? entry.getImageName() : imageData.getServer().getMetadata().getName()
String name = GeneralTools.stripExtension(imageName)
File base = new File(PREDICTIONS_DIR)
if (!base.isAbsolute())
    base = new File(buildFilePath(PROJECT_BASE_DIR, PREDICTIONS_DIR))
File geojson = new File(new File(base, name), name + '.geojson')
if (!geojson.isFile())
    throw new FileNotFoundException("import_predictions.groovy: ${geojson} not found for image ${imageName}; run 07_infer_slide for this slide or set PREDICTIONS_DIR")

def result = importPredictions(imageData.getHierarchy(), geojson, CLASSES_TO_REPLACE, REPLACE_DETECTIONS)
if (!result.unknown.isEmpty())
    println "WARNING ${name}: classes ${result.unknown} are not in CLASSES_TO_REPLACE; earlier objects of them are kept"

// Project step: save the image data (not run by the tests: their project has no image entry).
if (entry != null)
    entry.saveImageData(imageData)

println "Imported ${result.added} objects into ${imageName} from ${geojson} (removed ${result.removed} earlier ones)"


/**
 * Read the predictions with QuPath's GeoJSON reader (File > Import objects), colour their
 * classes as the GeoJSON does, then remove the earlier objects of the replaced classes and
 * add the new ones. The file is read before anything is removed, so a bad file leaves the
 * objects as they were. (QuPath's reader keeps the colour a class already has, e.g. from an
 * earlier import or the project's class list: the colours are set here.)
 */
Map importPredictions(PathObjectHierarchy hierarchy, File geojson, Collection<String> classesToReplace,
                      boolean replaceDetections) {
    def imported
    try {
        imported = PathIO.readObjects(geojson)
    } catch (Exception e) {
        throw new IOException("import_predictions.groovy: ${geojson} is not a GeoJSON QuPath can read (${e.getMessage()}); " +
                'write it again with 07_infer_slide', e)
    }
    def colours = [:]   // class name -> [r, g, b] of the GeoJSON's classifications
    def root = geojson.withReader('UTF-8') { reader -> JsonParser.parseReader(reader) }
    root.getAsJsonObject().getAsJsonArray('features').each { f ->
        def props = f.getAsJsonObject().get('properties')
        def c = props != null && props.isJsonObject() ? props.getAsJsonObject().get('classification') : null
        if (c != null && c.isJsonObject() && c.getAsJsonObject().has('name') && c.getAsJsonObject().has('color')) {
            def rgb = c.getAsJsonObject().getAsJsonArray('color')
            colours[c.getAsJsonObject().get('name').getAsString()] = (0..2).collect { rgb.get(it).getAsInt() }
        }
    }
    imported*.getPathClass().findAll { it != null }.unique().each { pc ->
        def rgb = colours[pc.toString()]
        if (rgb != null)
            pc.setColor(rgb[0] as int, rgb[1] as int, rgb[2] as int)
    }
    def replace = classesToReplace as Set
    def unknown = imported.findAll { it.getPathClass() != null && !replace.contains(it.getPathClass().getName()) }
            .collect { it.getPathClass().getName() }.unique()
    def old = hierarchy.getAllObjects(false).findAll { obj ->
        obj.getPathClass() != null && replace.contains(obj.getPathClass().getName()) &&
            (obj.isAnnotation() || (replaceDetections && obj.isDetection()))
    }
    hierarchy.removeObjects(old, true)
    hierarchy.addObjects(imported)
    return [added: imported.size(), removed: old.size(), unknown: unknown]
}
